"""Fleet decisions: the signed decision format shared by the mesh and the agents."""
