"""`ray job submit` entrypoint for a sweep; the same flags as `simgan-dist tune`.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py --config jobs/configs/tune-eye.yaml
"""

import sys

from simgan_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
