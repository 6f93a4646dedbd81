"""mLiT / mmLiT: Mixture-of-Experts lightweight vision transformers (models, data, training)."""

__version__ = "0.1.0"
