"""TRL-style training script: the same entry point as `trl-ltc distill`, for `accelerate launch`.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml \
        scripts/distill.py --config configs/qwen3-1.7b_from_qwen3-30b-a3b.yaml [--any_field value ...]

    # the same launch done by the command, with an accelerate config shipped in the package (or a path):
    python scripts/distill.py --accelerate_config fsdp2 --num_processes 8 \
        --config configs/qwen3-1.7b_from_qwen3-30b-a3b.yaml

    python scripts/distill.py --help        # every field of the recipe, with its help text
"""

import sys

from trl_ltc.commands.distill import main

if __name__ == "__main__":
    sys.exit(main())
