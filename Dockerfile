# The image every Ray node of a simgan_dist cluster runs (head and GPU workers).
FROM rayproject/ray:2.60.0-py312-gpu

# The base image runs as the non-root user `ray` (uid 1000) with a writable $HOME.
USER ray
WORKDIR /home/ray/simgan_dist

# torch first and pinned, so deepspeed and the project never pull another build.
RUN pip install --no-cache-dir torch==2.13.0 deepspeed==0.19.8

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users simgan_dist ./simgan_dist
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir .

# DeepSpeed's op builder misreads TORCH_CUDA_ARCH_LIST=9.0a; the trainer uses torch's Adam.
ENV DS_BUILD_OPS=0
