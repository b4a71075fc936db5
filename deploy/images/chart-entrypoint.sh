#!/bin/sh
# What the Bytewax Helm chart (and waxctl, which deploys it) runs in the image's working
# folder: `sh ./entrypoint.sh` (its StatefulSet's command, not a setting). Here that is
# the dataflow role; bytewax.run reads the chart's BYTEWAX_* variables (hostfile, pod
# name, workers, recovery directory and intervals) itself. deploy/k8s/waxctl/README.md.
exec fleetpulse-entrypoint dataflow
