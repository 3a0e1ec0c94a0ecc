#!/bin/sh
# The system packages the tests use: Postfix's smtp-sink (a fault-injecting upstream), swaks,
# Chromium and its WebDriver (headless browser tests of the status page) and Prometheus's
# promtool (checks of contrib/prometheus). Debian (apt-get); uses sudo unless root.
#
# Does nothing when every command is already there. Otherwise it installs the packages
# without recommends and without letting them configure or start anything: the postfix
# package is preseeded to "No configuration", and a temporary /usr/sbin/policy-rc.d (exit
# 101: "action forbidden") keeps every package's service from starting during the install,
# above all the prometheus package's server, which would listen on all interfaces.
set -eu

have() { command -v "$1" >/dev/null 2>&1; }

if { have smtp-sink || [ -x /usr/sbin/smtp-sink ]; } && have swaks && have chromium \
    && have chromedriver && have promtool; then
    exit 0
fi

as_root=""
[ "$(id -u)" -eq 0 ] || as_root="sudo"

policy=/usr/sbin/policy-rc.d
created_policy=""
remove_policy() {
    if [ -n "$created_policy" ]; then
        $as_root rm -f "$policy"
    fi
}
trap remove_policy EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ -e "$policy" ]; then
    # The machine's own policy, left as it is.
    echo "system-deps.sh: keeping the existing $policy" >&2
else
    printf '#!/bin/sh\n# Written by mailrelay tests/system-deps.sh; removed when it ends.\nexit 101\n' \
        | $as_root tee "$policy" >/dev/null
    created_policy=yes
    $as_root chmod 755 "$policy"
fi

prometheus_was_installed=""
if dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "install ok installed"; then
    prometheus_was_installed=yes
fi

echo "postfix postfix/main_mailer_type select No configuration" | $as_root debconf-set-selections
$as_root apt-get update -q
# env after sudo: sudo does not pass DEBIAN_FRONTEND on.
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    postfix swaks chromium chromium-driver prometheus

# Only promtool is wanted from the prometheus package: keep its server from starting at boot
# too, unless it was installed before (then it is the machine's).
if [ -z "$prometheus_was_installed" ]; then
    if have systemctl; then
        $as_root systemctl disable prometheus.service >/dev/null 2>&1 || true
    fi
    if have update-rc.d; then
        $as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
fi
