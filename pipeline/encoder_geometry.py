"""Does a segmentation's tiling match an encoder's native patch geometry? (one warning, with the fix)"""

from __future__ import annotations


def geometry_warning(backbone: str, seg_tag: str, seg_params: dict, weights_id: str = "") -> str | None:
    """A one-line warning when ``seg_params`` tiles differently from ``backbone``'s native geometry.

    Parameters
    ----------
    backbone : registered encoder name (``timm:<name>`` and unknown names: no opinion).
    seg_tag : the segmentation folder's tag, named in the message.
    seg_params : the ``params`` of the segmentation's ``params.json`` (``target_mpp`` in
        micrometres per pixel, ``patch_px`` in pixels at that resolution, ``patch_level``).

    Returns
    -------
    str or None: what differs and the ``segment`` command that tiles natively.
    """
    from extract.backbones import backbone_card

    card = backbone_card(backbone)
    if card is None or not seg_params or weights_id == "random":
        return None
    native = f"{card.native_patch_px} px patches at {card.native_mpp:g} mpp"
    fix = (f"for its native geometry run `wsi-pipeline segment --target-mpp {card.native_mpp:g} "
           f"--patch-size {card.native_patch_px}` and extract with --seg-tag of that segmentation")
    if seg_params.get("patch_level") is not None:
        return (f"backbone {backbone} was trained on {native}; segmentation '{seg_tag}' tiles at pyramid "
                f"level {seg_params['patch_level']} (resolution unknown to it); {fix}")
    mpp, px = seg_params.get("target_mpp"), seg_params.get("patch_px")
    if mpp is None or px is None:
        return None
    if abs(float(mpp) - card.native_mpp) > 0.1 * card.native_mpp or int(px) != card.native_patch_px:
        return (f"backbone {backbone} was trained on {native}; segmentation '{seg_tag}' tiles {int(px)} px "
                f"at {float(mpp):g} mpp (patches are resized to {card.input_size} px either way); {fix}")
    return None
