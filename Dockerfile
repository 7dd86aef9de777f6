# vLLM's OpenAI server image with ReFreeKV installed and its CUDA kernel built ahead of time.
#
#   docker build -t refreekv-vllm .                      # --build-arg VLLM_TAG=v0.26.0
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface \
#       refreekv-vllm Qwen/Qwen2.5-7B-Instruct --additional-config '{"refreekv": {}}'
#
# Arguments are those of `vllm serve` (model first), as with vLLM's own image; the entry point
# adds the refreekv section when --additional-config lacks one.
ARG VLLM_TAG=v0.26.0

FROM vllm/vllm-openai:${VLLM_TAG} AS build
# Compute capabilities to compile the kernel for ("8.0;9.0" adds A100s); Hopper by default.
ARG TORCH_CUDA_ARCH_LIST=9.0
WORKDIR /src
COPY . .
# The build needs torch and nvcc from the vLLM image, hence no build isolation.
RUN REFREEKV_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    python3 -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM vllm/vllm-openai:${VLLM_TAG}
COPY --from=build /wheels /tmp/wheels
RUN python3 -m pip install --no-deps --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
# vLLM loads endpoint plugins only when VLLM_PLUGINS names them; the list then applies to
# general plugins too, so vLLM's own LoRA resolver stays in it.
ENV VLLM_PLUGINS=refreekv,refreekv_endpoints,lora_filesystem_resolver \
    REFREEKV_SERVE_HOST=0.0.0.0
EXPOSE 8000
# Cold starts compile CUDA graphs and load weights: give them ten minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["refreekv-serve"]
