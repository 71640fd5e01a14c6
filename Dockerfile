# The image every Ray node of a simgan_dist cluster runs (head and GPU workers):
#   docker build -t REGISTRY/simgan-dist:0.1.0 . && docker push REGISTRY/simgan-dist:0.1.0
# The base image's Ray version is pyproject.toml's pin (tests/test_manifests.py checks it).
FROM rayproject/ray:2.60.0-py312-gpu

# The base image runs as the non-root user `ray` (uid 1000) with a writable $HOME.
USER ray
# Job entrypoints in cluster/*.yaml are absolute paths under this folder.
WORKDIR /home/ray/simgan_dist

# Read by the DeepSpeed install below, so it must come first: build no ops at install time
# (DeepSpeed's op builder misreads the image's TORCH_CUDA_ARCH_LIST=9.0a; the trainer uses
# torch's Adam and needs none).
ENV DS_BUILD_OPS=0

# torch first and pinned, as the Makefile does, so deepspeed and the project never pull another build.
RUN pip install --no-cache-dir torch==2.13.0

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users simgan_dist ./simgan_dist
COPY --chown=ray:users jobs ./jobs
# The project with pyproject.toml's pins: ray[default,train,tune,data]==2.60.0, deepspeed==0.19.8.
RUN pip install --no-cache-dir .
