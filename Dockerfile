# fedwb: one image for the aggregator, the agents and the tools.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY aggregator aggregator
COPY edge_agent edge_agent
COPY broker broker
COPY sim sim
COPY bench bench
COPY fedwb fedwb
RUN pip install --no-cache-dir '.[all]'
USER 65534
ENTRYPOINT []
CMD ["fedwb", "--help"]
