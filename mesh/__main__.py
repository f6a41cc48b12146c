"""`python -m mesh`: the swarm-mesh command."""
from mesh.cli import main

main()
