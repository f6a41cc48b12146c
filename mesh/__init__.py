"""swarm-mesh: the Swarm mesh service (reporting API, fleet store, fleet decisions)."""
