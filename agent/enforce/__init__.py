"""enforce stage; see DESIGN.md."""
