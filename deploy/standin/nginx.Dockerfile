# Stand-in for Docker Hub's `nginx:1.27-alpine` image, for hosts that cannot pull it (the compose
# test): Debian's nginx with the official image's layout where compose relies on it (configuration
# in /etc/nginx/conf.d, logs to the container's output, `/bin/sh`). Build: deploy/standin/build.sh.
ARG BASE=vpt-standin/base:bookworm
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d /etc/nginx/sites-enabled/* \
 && mkdir -p /etc/nginx/conf.d \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
