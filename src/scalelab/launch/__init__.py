"""Starting ranks: the launcher command lines (:mod:`scalelab.launch.commands`)."""
