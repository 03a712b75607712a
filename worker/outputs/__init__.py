"""Outputs: image files (``encoding``), bucket upload (``upload``), and delivery: data URIs or
URLs, the response dict and its size limits (``delivery``)."""
