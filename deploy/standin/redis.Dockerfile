# Stand-in for Docker Hub's `redis:7` image, for hosts that cannot pull it (the compose test):
# Debian's Redis 7 with an entrypoint that behaves like the official image's where compose relies
# on it (see redis-entrypoint.sh). Build: deploy/standin/build.sh.
ARG BASE=vpt-standin/base:bookworm
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
