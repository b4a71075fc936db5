# The local stand-in for python:3.11-slim-bookworm where no registry is reachable: the
# debootstrap base (`just images` makes it) with Debian's Python 3.11 and venv.
ARG BASE
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
