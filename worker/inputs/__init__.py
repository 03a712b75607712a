"""Inputs: from a validated request to a ``Plan`` with its images (``prepare``), decoding the
caller's images within limits (``images``) and fetching their URLs SSRF-safely (``fetch``)."""
