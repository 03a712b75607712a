"""Per-request adapters (LoRAs), the pure side: where a file comes from, the disk and memory
caches' bookkeeping. Merging into the weights is torch: ``worker/engine/adapters.py``."""
