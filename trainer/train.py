"""Entry point of the training step: `torchrun train.py --max_steps 1000 ...` on SageMaker or a laptop.

The SageMaker PyTorch container's `torch_distributed` launcher runs this file under torchrun on every
instance. It resumes from the newest complete checkpoint in `/opt/ml/checkpoints` (which SageMaker restores
after a spot interruption), trains, and writes the fine-tuned model to SM_MODEL_DIR.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

# Everything below must already be in the training image: the job runs with no internet, so nothing
# can be pip-installed at start (sagemaker-python-sdk#2199).
REQUIRED_MODULES = ("torch", "transformers", "safetensors", "numpy", "accelerate")


def check_imports() -> None:
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: the training image lacks {', '.join(missing)}; it must provide "
              f"{', '.join(REQUIRED_MODULES)} (see requirements-image.txt)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    check_imports()
    from settings import SettingsError, parse_settings

    try:
        settings = parse_settings(argv)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if settings.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        print("error: mlflow_tracking_uri is set but the training image lacks mlflow (and, for a SageMaker "
              "tracking server, sagemaker-mlflow)", file=sys.stderr)
        return 2
    from environment import Topology, bind_gloo_to_the_instance_network, ensure_rendezvous_defaults
    from loop import Trainer

    topology = Topology.from_environment()
    logging.basicConfig(level=logging.INFO if topology.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ensure_rendezvous_defaults()
    interface = bind_gloo_to_the_instance_network()
    if topology.is_main:
        print(f"[network] gloo on {'interface ' + interface if interface else 'the host name address'}", flush=True)
    from checkpointing import CheckpointLayoutError
    from memory import DoesNotFit
    from modeling import ModelError
    from tokens import DataError

    try:
        trainer = Trainer(settings, topology)
    except (ModelError, DataError, DoesNotFit) as error:  # every rank reads the same folder and fails alike; one line is enough
        if topology.is_main:
            print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return trainer.train()
    except CheckpointLayoutError as error:
        if topology.is_main:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main())
