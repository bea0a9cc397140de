#!/usr/bin/env bash
# Installs, from Debian's packages, the servers and tools the tests drive when they are missing:
# PostgreSQL and Mosquitto (started on free loopback ports by the fixtures, tests/services.py),
# Prometheus with promtool, headless Chromium, and Java with Maven for Apache Kafka's jars. Without root or apt-get it only warns: the tests
# that need what is missing are then skipped, with a reason saying how to install it.
set -euo pipefail

missing=()
{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } \
  && id postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v java >/dev/null || missing+=(default-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing from Debian's packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "warning: ${missing[*]} missing and not root: the tests that need them will be skipped" >&2
fi
