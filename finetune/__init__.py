"""Stage 3: fine-tune a backbone on ADE20K (UperNet), COCO (Mask R-CNN) and label-efficient segmentation."""
