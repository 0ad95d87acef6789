"""Data tools: tiny fixture tokenizers, MP-GUI's SRP and AITW generators, the synthetic-data pipeline."""
