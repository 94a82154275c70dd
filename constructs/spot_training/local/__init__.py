"""The local emulation: what runs a pipeline definition on this machine (`spot-training local-run`). The
pipeline's steps run through the training image's own launcher, with SageMaker emulated around them:
instances, channels, checkpoint sync and spot interruptions.

May import: `spot_training.config`, `spot_training.definition`, `spot_training.operations` (the data
fingerprint `start` computes) and the trainer's files; never `spot_training.cdk`. Modules, in the order a
run uses them: `jobs` (the jobs read from the definition, and their attempts), `storage` (the local S3 and
the checkpoint sync), `instances` (each instance's /opt/ml and the launcher), `processing` (the processing steps,
the preparation's cache), `run` (the attempts, interruptions and stops), `evaluation` (the steps after training:
evaluation, gate, registration request), `report`; `supervisor` and `processes`
stand in for the container runtime; `tiny` makes the tiny model and data a local run trains on.

What SageMaker does, and what stands in for it here:
- the training step is the one `cdk synth` deploys: the definition comes from `definition.build.generate` with
  the same config (cdk.json), then is resolved like one execution with CPU-sized parameter overrides;
- each instance gets the `/opt/ml` tree SageMaker mounts, under `DIR/instances/algo-<i>/opt/ml/`:
  `input/config/{hyperparameters,inputdataconfig,resourceconfig}.json` written from the step's arguments,
  every channel downloaded to `input/data/<channel>/` (the code archive under its object name), `model/`,
  `output/data/` and the checkpoint folder restored from the checkpoint prefix;
- on each instance the image's entry point runs: the sagemaker-training toolkit's `train` command with
  `SAGEMAKER_TRAINING_MODULE` set as the image sets it and `SAGEMAKER_BASE_DIR` pointing at that instance's
  `/opt/ml`. The toolkit does the rest as in the container: extracts `sagemaker_submit_directory`, runs its
  pip step when the code holds a requirements.txt, exports the `SM_*` variables and builds the torchrun
  command (`torchrun --nnodes N --nproc_per_node P --master_addr <first host> --master_port 7777 ...`);
- the instances are named 127.0.0.1, 127.0.0.2, ... (SageMaker's algo-1, algo-2, ...): names the toolkit's
  DNS wait and torchrun resolve to this machine without any /etc/hosts entry. The toolkit's fixed port 7777
  means one local run at a time on a machine;
- "S3" is the folder `DIR/s3/<bucket>/`. Each instance's checkpoint folder is synced to the checkpoint
  prefix continuously, as SageMaker does: new and changed files are copied (partial files included, as an
  upload in progress would be) and files deleted in the container are deleted from the prefix;
- each instance's first process is the step's ContainerEntrypoint (the platform's entry point, which runs the
  image's command) or, without one, the image's command, inside a supervisor that stands in for the container
  runtime; an interruption or a stop signals each container's first process only, as StopTrainingJob does,
  waits a grace period, syncs once more, then SIGKILLs everything; fresh instances get the checkpoint prefix
  restored and the job starts again. An interruption comes once a step is reached or, on request, while the
  first checkpoint write of a step at or after it is in progress on the first instance (its `step-N/` folder
  there without COMPLETE.json): a reclaim in the middle of a save, the case that the resume must survive.
- the preparation step (when the pipeline has one) runs first, from the same definition, the way SageMaker
  Processing runs a container: each ProcessingInput copied from "S3" to its LocalPath, the step's entrypoint
  and arguments run with the container's /opt/ml/processing (and /tmp) at folders of this run, each
  ProcessingOutput uploaded to its destination; the training step's `train` channel is that output. Pipelines
  step caching is emulated: the same resolved arguments (and the same code archive, whose CDK asset key is its
  hash) as an earlier successful run in this --out skip the step and reuse its output;
- after training, the Evaluate step runs the same way on the uploaded model; the gate is evaluated on its
  property file as Pipelines evaluates it, and the registration's CreateModelPackage request is written, not
  sent;
What it does not prove: real S3 consistency and throughput, real spot reclaim timing and notice, EFA/NCCL
networking, GPU memory behaviour, network isolation. See the README's "Local run" section.
"""
