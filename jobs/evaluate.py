"""`ray job submit` entrypoint for the evaluation: the same flags as `simgan-dist evaluate`.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --synthetic s3://b/synthetic --refined s3://b/refined \
        --real-test s3://b/real_test --out /tmp/report --preset eye

Inside a submitted job `ray.init()` joins the job's cluster, so the gaze variants run
as tasks on its GPUs.
"""

import sys

from simgan_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
