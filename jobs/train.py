"""`ray job submit` entrypoint for training; the same flags as `simgan-dist train`.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/eye.yaml --set train.num_workers=8
"""

import sys

from simgan_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
