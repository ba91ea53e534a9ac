# imgbot: Telegram + Discord image bots. Build: docker build -t imgbot .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DATABASE_URL=sqlite:////data/imgbot.db

WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY bots ./bots
# Installed the same way the README does: pip install of the project.
RUN pip install --no-cache-dir . \
    && groupadd --gid 10001 imgbot \
    && useradd --create-home --uid 10001 --gid 10001 imgbot \
    && mkdir -p /data/results \
    && chown -R imgbot:imgbot /data

USER 10001:10001
VOLUME ["/data"]
HEALTHCHECK --interval=60s --timeout=10s --start-period=20s --retries=3 \
    CMD ["imgbot", "health"]
CMD ["imgbot", "run"]
