#!/bin/bash
# Session 24 lease 4: the FP8 primitive under lane vs warpgroup semantics, with the UPCAST_2X load or a plain one.
set -u
for sem in lane warpgroup; do for load in upcast plain; do
  PYTHONPATH=. timeout 60 python3 _gpu/probe_lane.py $sem $load 2>&1 | grep -v "^W\|^I" | tail -4
done; done
