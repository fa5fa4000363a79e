"""Task heads on top of :class:`training.backbone.Backbone`."""
