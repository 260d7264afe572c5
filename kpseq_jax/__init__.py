"""kpseq_jax: keypoint-sequence pose estimation in JAX/Flax.

A top-down crop of one object is encoded by a ResNet and a transformer decoder
generates ``<coord> x y <sep> ... <eos>`` (Raster2Seq-style sequence generation
applied to MP-100 category-agnostic pose estimation).
"""
