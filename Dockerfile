# GPU image: vLLM's own OpenAI server image with this plugin installed.
FROM vllm/vllm-openai:v0.26.0
COPY . /opt/refreekv-vllm
RUN pip install --no-deps /opt/refreekv-vllm
ENTRYPOINT ["refreekv-serve", "--host", "0.0.0.0"]
