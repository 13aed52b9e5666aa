"""``kvcompact demo``: a scripted agent session on the embedded model, run with a
plain DynamicCache and with kvcompact side by side (see :mod:`.runner`)."""
