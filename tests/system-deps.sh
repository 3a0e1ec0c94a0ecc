#!/bin/sh
# The system packages the tests use: Postfix's smtp-sink (a fault-injecting upstream) and
# swaks, installed without letting the postfix package configure or start a mail system.
# Does nothing when they are already there. Debian/Ubuntu (apt-get); uses sudo unless root.
set -eu
if command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ]; then
    exit 0
fi
as_root=""
[ "$(id -u)" -eq 0 ] || as_root="sudo"
echo "postfix postfix/main_mailer_type select No configuration" | $as_root debconf-set-selections
$as_root apt-get update -q
DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -q --no-install-recommends postfix swaks
