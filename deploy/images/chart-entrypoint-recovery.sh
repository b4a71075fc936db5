#!/bin/sh
# The Bytewax Helm chart's recovery init container runs `sh ./entrypoint-recovery.sh`
# to create its recovery partitions. fleetpulse's dataflow creates them itself when the
# folder is empty (FLEETPULSE_RECOVERY_PARTITIONS, dataflows/fleet.py), also outside the
# chart, so there is nothing to do here.
echo "fleetpulse: recovery partitions are created by the dataflow at its first start"
