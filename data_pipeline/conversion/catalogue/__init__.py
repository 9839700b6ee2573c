"""Your own product catalogue, a folder per class or a catalogue table, to the verified
shards and manifest that training reads, with splits that do not leak and a data report.

    msff-catalogue --image_root ROOT --output_dir OUT [--table FILE]
    (or python -m data_pipeline.conversion.catalogue ...; --help lists the flags)

`catalogue.convert.convert` is the library entry; docs/GUIDE.md describes the layouts
and the flags.
"""
