"""The application beside the library (as open_clip_train beside open_clip): the ``taskres`` command, the demo
runner, and the tables and plots. The library (everything else in ``taskres``) never imports this package."""
