"""The offline demo: procedurally generated data for the small CLIP that ships in ``taskres/assets``."""
