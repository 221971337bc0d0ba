# The least a host sets: the node with its defaults (its own key, no hook, no substituter).
{ services.narmesh.enable = true; }
