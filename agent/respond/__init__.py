"""respond stage; see DESIGN.md."""
