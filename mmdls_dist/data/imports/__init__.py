"""Hospital exports -> the raw layout: DICOM (CT series, RTSTRUCT / SEG contours, PET) and
NIfTI volumes with a clinical spreadsheet, through a mapping file (mapping.py)."""
