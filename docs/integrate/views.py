# --- tokens: a first get_token() in a view, e.g. in mysite/views.py -------------------------
from django.http import JsonResponse

from tokens import TokenError, get_token


def partner_status(request):
    try:
        token = get_token("partner")
    except TokenError as error:
        return JsonResponse({"ok": False, "error": str(error)}, status=503)
    return JsonResponse({"ok": True, "token_length": len(token)})
