"""Where bytes live: local folders and ``s3://`` URIs behind one interface (``storage``) and
content-addressed artifacts published to and fetched from it (``artifacts``). Imports ``core`` only.
"""
