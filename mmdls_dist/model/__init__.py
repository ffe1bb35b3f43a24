"""The MM-DLS network. Where the publication's parts are:

    LungLesionSegmentor      segmentor.py  LungLesionSegmentor (ResNet encoder, two decoders,
                                           lesion -> lung cross-attention)
    LesionEncoder            views.py      LesionEncoder (a slice view)
    SpaceEncoder             views.py      SpaceEncoder (a slice view)
    LesionAttentionFusion    fusion.py     SliceFusion
    PatientLevelFusionModel  fusion.py     PatientFusion + heads.py TaskHeads
    CoxPHLoss                train/losses.py cox_loss (global batch, fixed shapes)

Added here: views.py MaskPolicy (which mask each view reads), reader.py LesionReader and
descriptors.py LesionDescriptors (patient-level lesion views), mmdls.py MMDLS (composes
everything -> output.py ModelOutput).
"""
