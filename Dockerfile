FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY project ./project
COPY tokens ./tokens
COPY manage.py Procfile ./
# The app (django-outbound-tokens) with the example project's stack; project/ runs from /app.
ENV PYTHONPATH=/app
RUN pip install --no-cache-dir ".[stack]" \
 && useradd --create-home app \
 && DJANGO_SECRET_KEY=build REDIS_URL=redis://unused:6379/0 TOKENS_ENCRYPTION_KEYS=$(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())') \
    DJANGO_STATIC_ROOT=/app/static python manage.py collectstatic --no-input -v 0
USER app
EXPOSE 8000 5555
CMD ["gunicorn", "project.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3"]
