#!/bin/sh
# pip-install.sh VENV LOCK...: install hashed lock files into VENV, exactly and nothing else.
#
# Bind-mounted into the RUN steps that install packages; never copied into an image. If the build was given
# an extra CA (BuildKit secret `extra_ca`, for a TLS-intercepting proxy), pip trusts it for this one command:
# the bundle is written to a tmpfs mount and is gone when the step ends, so no layer holds it.
set -eu
venv=$1
shift
if [ -s /run/secrets/extra_ca ]; then
    bundle=/run/olivepress-ca/bundle.pem
    # pip's own CA bundle plus the extra one: --cert replaces the default bundle rather than adding to it.
    cat "$("$venv/bin/python" -c 'import pip._vendor.certifi as c; print(c.where())')" /run/secrets/extra_ca >"$bundle"
    export PIP_CERT="$bundle"
fi
for lock in "$@"; do
    set -- "$@" -r "$lock"
    shift
done
# --no-deps: the lock is complete, so pip resolves nothing. --no-build-isolation: the one sdist (autoawq) builds
# with the locked setuptools rather than whatever PyPI serves that day. --use-pep517: no legacy setup.py install.
exec "$venv/bin/pip" install --require-hashes --no-deps --no-build-isolation --use-pep517 \
    --no-cache-dir --disable-pip-version-check --no-input --progress-bar off "$@"
