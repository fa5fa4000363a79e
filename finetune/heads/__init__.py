"""Task heads on top of :class:`finetune.backbone.Backbone`."""
