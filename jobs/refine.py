"""`ray job submit` entrypoint for the batch refinement job: the same flags as `simgan-dist refine`.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/refine.py --checkpoint s3://b/runs/simgan/checkpoint_000003 \
        --input s3://b/synthetic --out s3://b/refined --preset eye \
        --set refine.num_gpus=1 --set refine.min_actors=1 --set refine.max_actors=8

Inside a submitted job `ray.init()` joins the job's cluster: an actor pool of
refine.min_actors..refine.max_actors refiners with refine.num_gpus GPUs each, growing as
the autoscaler adds GPU nodes. If the job or its driver dies, submit the same command
again: finished shards are verified (in the actors) and kept.
"""

import sys

from simgan_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["refine", *sys.argv[1:]]))
