"""The built-in ``segmentation`` task: per-image overlap and surface metrics, voxel calibration
and Dice-failure detection for 2D and 3D segmentation networks."""
