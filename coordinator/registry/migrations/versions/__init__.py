"""Migration revisions, one file each, named ``NNNN_what.py``; never edit a released one."""
