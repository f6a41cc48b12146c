"""The lab: attack generators (swarmlab.attacks), throw-away namespaces and agents
(swarmlab.lab, swarmlab.breachlab), the scenarios behind `swarm-agent demo`
(swarmlab.scenario, swarmlab.demo).

Tests, benches and the demo use it from a checkout (install.sh puts the checkout on the
venv's path). It is not part of the product: packaging/build.sh ships agent/ only, no
module under agent/ imports it (tests/unit/test_layering.py), and the .deb's file list is
checked for it (tests/integration/test_packaging_deb.py).
"""
