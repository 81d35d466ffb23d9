#!/usr/bin/env bash
# Build what the compose stack needs on a host that cannot pull from Docker Hub: a Debian stand-in
# for the CUDA base image (cached by tag), stand-ins for the redis and nginx images, and the
# project's image on that base. Layers are cached; a second run takes seconds.
#
#   deploy/standin/build.sh                 # names below, overridable through the environment
#   export VPT_CUDA_IMAGE=... VPT_REDIS_IMAGE=... VPT_PROXY_IMAGE=... VPT_IMAGE=...
#   docker compose -f docker-compose.yml -f docker-compose.cpu.yml up -d
#
# The host's CA bundle goes into the project's image (EXTRA_CA_CERTS), so that pip and apt work
# behind a TLS-intercepting proxy; VPT_EXTRA_CA_CERTS=deploy/ca/none.pem leaves it out.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${VPT_CUDA_IMAGE:-vpt-standin/base:bookworm}
redis=${VPT_REDIS_IMAGE:-vpt-standin/redis:7}
proxy=${VPT_PROXY_IMAGE:-vpt-standin/nginx:1}
image=${VPT_IMAGE:-vpt-serve}:${VPT_IMAGE_TAG:-latest}
ca=${VPT_EXTRA_CA_CERTS:-}
if [ -z "$ca" ]; then
    ca=deploy/ca/none.pem
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
        cat /etc/ssl/certs/ca-certificates.crt > deploy/ca/host.pem
        ca=deploy/ca/host.pem
    fi
fi

deploy/standin/base.sh "$base"
for spec in "$redis:deploy/standin/redis.Dockerfile" "$proxy:deploy/standin/nginx.Dockerfile"; do
    tag=${spec%:*} file=${spec##*:}
    echo "stand-in image $tag"
    docker build -q --build-arg "BASE=$base" -t "$tag" -f "$file" deploy/standin >/dev/null
done
echo "project image $image on $base (extra CA certificates: $ca)"
docker build --build-arg "CUDA_IMAGE=$base" --build-arg "EXTRA_CA_CERTS=$ca" -t "$image" .
